"""criv's operator side: the commands an operator runs against a live criv (`criv pods`,
`inspect`, `console`, `debug`) and the daemon's scrape-time metrics source."""
