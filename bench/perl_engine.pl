#!/usr/bin/perl
# Perl FCGI::Engine (Debian libfcgi-engine-perl) serving the benchmark's app: hello world, or
# "VERSION LENGTH-OF-BODY" when HELLO_VERSION is set (the rollout benchmark writes one script
# per release with its version in it). BOOT_SECONDS imitates a slow app import.
use strict;
use warnings;

package Hello;
our $TAG = $ENV{HELLO_VERSION};

sub handler {
    my $len = $ENV{CONTENT_LENGTH} || 0;
    my $body = '';
    read(STDIN, $body, $len) if $len;
    my $out = defined $TAG ? "$TAG " . length($body) : "hello world\n";
    print "Status: 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
        . length($out) . "\r\n\r\n" . $out;
}

package main;
use FCGI::Engine;

FCGI::Engine->new_with_options(
    handler_class        => 'Hello',
    handler_method       => 'handler',
    handler_args_builder => sub { undef },
    pre_fork_init        => sub { sleep($ENV{BOOT_SECONDS} || 0) },
)->run;
