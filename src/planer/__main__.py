from planer.cli import main

raise SystemExit(main())
