"""URLs of the test site: the admin, /hello/, /wait/ and /kind/."""

from django.contrib import admin
from django.urls import path

from mysite import views

urlpatterns = [
    path("admin/", admin.site.urls),
    path("hello/", views.hello),
    path("wait/", views.wait),
    path("kind/", views.kind),
]
