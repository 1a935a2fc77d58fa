from researcher.cli import main

main()
