"""``sftp://`` destinations. Importing the package is cheap; asyncssh is imported by the
modules that speak SFTP (``destination``, ``pool``, ``session``, ``errors``, ``openssh``,
``keys``), only when an SFTP destination is opened or checked."""
