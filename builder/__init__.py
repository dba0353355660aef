"""Build host side of fieldpack: checkpoint + documents -> signed bundle. Heavy imports (torch, transformers)
happen inside the functions that need them, never at package import."""
