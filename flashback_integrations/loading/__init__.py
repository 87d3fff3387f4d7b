"""Where weights come from and go to: the default model, devices and dtypes, adapters (load, save, the shipped
ones), other backends' model files, and ``flashback export``."""
