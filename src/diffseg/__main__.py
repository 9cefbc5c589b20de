from diffseg.runtime.cli import main

raise SystemExit(main())
