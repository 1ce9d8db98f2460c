#!/bin/sh
{{env}}exec{{argv}}
