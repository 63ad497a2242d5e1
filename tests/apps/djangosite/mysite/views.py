"""The test site's own views: a text answer, one that waits half a second, and one that says
which handler (WSGI or ASGI) built the request."""

import threading
import time

from django.http import HttpResponse


def hello(request):
    return HttpResponse("hello from django\n", content_type="text/plain")


def wait(request):
    time.sleep(0.5)
    return HttpResponse(f"waited in {threading.get_ident()}\n", content_type="text/plain")


def kind(request):
    multithread = request.META.get("wsgi.multithread")
    return HttpResponse(f"{type(request).__name__} {multithread}\n", content_type="text/plain")
