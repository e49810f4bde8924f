from ptlab.cli.train import main

main()
