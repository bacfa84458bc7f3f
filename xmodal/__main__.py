from xmodal.cli import main

raise SystemExit(main())
