"""HRP in other libraries' trainers; each integration imports its library only when it is imported itself."""
