from rcopy.cli.main import main

raise SystemExit(main())
