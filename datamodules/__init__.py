"""visionlab DataModules: FFCV (.beton) and a torchvision fallback with the same interface."""
