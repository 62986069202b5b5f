from snag_dist.cli import main

raise SystemExit(main())
