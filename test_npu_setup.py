"""doctor placeholder for an import experiment."""
X = 1
