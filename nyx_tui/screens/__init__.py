"""The TUI's screens, one module per area. Screens never start processes or own state: they post the
messages in `messages` and the App (`nyx_tui.app.NyxApp`) acts on them."""
