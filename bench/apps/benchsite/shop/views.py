"""/items/: 20 rows from sqlite through the ORM, rendered by a Django template (the stock
middleware included); /hello/: a plain text answer."""

from django.http import HttpResponse
from django.shortcuts import render

from shop.models import Item


def items(request):
    rows = Item.objects.filter(stock__gt=0).order_by("name")[:20]
    return render(request, "shop/items.html", {"title": "Items", "items": rows})


def hello(request):
    return HttpResponse("hello from django\n", content_type="text/plain")
