from latentpatch.cli.app import main

main()
