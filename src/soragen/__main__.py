from soragen.cli import main

main()
