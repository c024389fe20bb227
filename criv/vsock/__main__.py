from criv.vsock.backend import main

raise SystemExit(main())
