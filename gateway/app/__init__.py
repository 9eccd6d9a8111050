"""The application: the service tree, the twistd entry point, the embedded demo."""
