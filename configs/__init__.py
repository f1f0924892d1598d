"""Built-in gslim recipes. This folder is the source; wheels ship it as the package gslim.configs."""
