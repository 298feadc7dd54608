from premoe.cli import main

raise SystemExit(main())
