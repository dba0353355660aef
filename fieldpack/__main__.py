from fieldpack.cli import main

main()
