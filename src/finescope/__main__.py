from finescope.cli import main

raise SystemExit(main())
