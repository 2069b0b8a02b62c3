from liverseg.cli import main

raise SystemExit(main())
