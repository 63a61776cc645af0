module cactl.test/gocheck

go 1.19
