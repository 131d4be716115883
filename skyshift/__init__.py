"""SkyShift: the shared library every role (api_server, controllers, scheduler, skylet, skyctl) imports."""
