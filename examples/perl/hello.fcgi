#!/usr/bin/perl
# A plain Perl FastCGI responder (Debian libfcgi-perl): it accepts on fd 0, the FastCGI way.
use strict;
use warnings;
use FCGI;

my $version = $ENV{HELLO_VERSION} || "perl-1";
my $request = FCGI::Request();
while ($request->Accept() >= 0) {
    my $path = $ENV{PATH_INFO} || $ENV{SCRIPT_NAME} || "/";
    my $body = "hello from perl ($version) $path\n";
    print "Status: 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
        . length($body) . "\r\n\r\n" . $body;
}
