"""Plain HTTP/1.1 to the nodes, for the two hot paths: the health prober (`prober`)
and the proxy's upstream pool (`upstream`), over one codec (`codec`). Nothing here
knows a node's routes or key: `lmfleet.node.client` builds what goes out."""
