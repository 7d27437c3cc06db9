from shoal.perf.cli import main

main()
