"""`python -m nyx_tui` is `nyx`."""

from nyx_tui.cli import main

raise SystemExit(main())
