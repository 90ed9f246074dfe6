"""Server side: the MQTT writer, the database writer and the energy report."""
