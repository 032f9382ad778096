from ai_worker.cli import main

main()
