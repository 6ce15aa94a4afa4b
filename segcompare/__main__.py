from segcompare.cli import main

raise SystemExit(main())
