"""The web console (`ai-worker console`): worlds, their characters and posts, models, dead letters."""
