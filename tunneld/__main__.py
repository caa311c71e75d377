from tunneld.cli import main

main()
