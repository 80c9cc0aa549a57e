"""kairos-plugin-services: TCP and UDP services carried between kairos nodes (``kairos service``)."""
