from cicd_dagster.cli import main

main()
