"""Data: image files, data sets and loaders, Real-ESRGAN degradation, the embedded demo set."""
