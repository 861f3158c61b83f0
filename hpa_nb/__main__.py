from hpa_nb.cli import main

raise SystemExit(main())
