"""What every surface's routes share: authentication, limits, errors (one shape per surface), request bodies, the app context, watcher slots, job feeds and relays."""
