"""Example web apps using pangea-session-sync's ``worker.sessions`` (see README "For the web app")."""
