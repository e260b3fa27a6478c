"""The fuzz targets, one module per parser family; each exports FACTORIES: name -> target."""
