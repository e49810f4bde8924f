from ptlab.train import main

main()
