// Driven by test_ngrok_clients.py under Node with the official @ngrok/ngrok package.
//
// argv[2] is the path of the @ngrok/ngrok package, argv[3] a JSON config for ngrok.forward().
// Prints one JSON line, {"url": ...} or {"error": message, "code": errorCode}; then, once stdin
// is closed, disconnects the listener (an Unbind) and prints {"closed": true}.
"use strict";

const ngrok = require(process.argv[2]);
const config = JSON.parse(process.argv[3]);

ngrok.forward(config).then(
  (listener) => {
    const url = listener.url();
    console.log(JSON.stringify({ url: url, id: listener.id() }));
    process.stdin.on("data", () => {});
    process.stdin.on("end", async () => {
      await ngrok.disconnect(url);
      console.log(JSON.stringify({ closed: true }));
      process.exit(0);
    });
  },
  (err) => {
    console.log(JSON.stringify({ error: String((err && err.message) || err), code: (err && err.errorCode) || null }));
    process.exit(3);
  },
);
