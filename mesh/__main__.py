from mesh.cli import entry

entry()
