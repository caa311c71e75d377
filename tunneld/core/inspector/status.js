// tunneld status page: refresh the session status and the tunnels' metrics every 2 seconds
// from the local API (the page itself is rendered by the agent).  Text only, never markup.
'use strict';

(function () {
  const fmt = (key, value) => {
    if (value === undefined || value === null) return '';
    if (key.startsWith('p')) return (Number(value) / 1e6).toFixed(2) + ' ms';
    if (key.startsWith('rate')) return Number(value).toFixed(4);
    return String(value);
  };

  async function refresh() {
    const live = document.getElementById('live');
    try {
      const [tunnels, status] = await Promise.all([
        fetch('/api/tunnels').then((r) => r.json()),
        fetch('/api/status').then((r) => r.json()),
      ]);
      const byName = new Map((tunnels.tunnels || []).map((t) => [t.name, t]));
      for (const cell of document.querySelectorAll('td[data-metric]')) {
        const t = byName.get(cell.getAttribute('data-tunnel'));
        if (!t || !t.metrics) continue;
        const [group, key] = cell.getAttribute('data-metric').split('.');
        const value = (t.metrics[group] || {})[key];
        if (value !== undefined) cell.textContent = fmt(key, value);
      }
      const st = document.getElementById('session-status');
      if (st && status.status) st.textContent = status.status;
      live.textContent = 'updated ' + new Date().toLocaleTimeString();
      live.className = 'live on';
    } catch (e) {
      live.textContent = 'agent unreachable';
      live.className = 'live off';
    }
  }

  refresh();
  setInterval(refresh, 2000);
})();
