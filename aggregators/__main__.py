from aggregators.cli import main

main()
