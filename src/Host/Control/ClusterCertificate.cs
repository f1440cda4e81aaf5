using System.Security.Cryptography;
using System.Security.Cryptography.X509Certificates;
using Akka.Actor.Setup;
using Akka.Remote.Transport.DotNetty;

namespace ActorVmm.Host.Control;

/// <summary>A cluster certificate or host directory that cannot be used safely, said in one line.</summary>
public sealed class ClusterSecurityException(string message) : Exception(message);

/// <summary>
/// Who may talk to a host: whoever holds the cluster certificate's private key. Every host node and
/// every `ctl` client loads the same certificate (a PKCS#12 file, mode 0600, owned by the user that
/// runs the hosts) and Akka remoting runs over TLS with mutual authentication (Akka.Remote's
/// DotNetty SSL, <see cref="DotNettySslSetup"/>): each side presents the certificate and accepts a
/// peer only if it presents that same certificate (pinned by thumbprint). A local user who cannot
/// read the file cannot finish a handshake, so cannot send a host a single message; a node with
/// another certificate is refused the same way.
///
/// The default file is <c>cluster.pfx</c> in the host directory (<see cref="HostDirectory"/>),
/// created on first use: a self-signed ECDSA P-256 certificate for this user's hosts on this
/// machine. Nodes on other machines get a copy of the file (or all load one given by
/// actorvmm.cluster.certificate).
/// </summary>
public static class ClusterCertificate
{
    public const string DefaultFileName = "cluster.pfx";
    private const UnixFileMode OwnerOnly = UnixFileMode.UserRead | UnixFileMode.UserWrite;
    private const UnixFileMode GroupOrOther = UnixFileMode.GroupRead | UnixFileMode.GroupWrite | UnixFileMode.GroupExecute
                                              | UnixFileMode.OtherRead | UnixFileMode.OtherWrite | UnixFileMode.OtherExecute;

    /// <summary>The certificate file hosts of <paramref name="directory"/> use unless configured otherwise.</summary>
    public static string DefaultPath(string directory) => Path.Combine(directory, DefaultFileName);

    /// <summary>
    /// Loads the certificate at <paramref name="path"/>, creating it (and its directory, owner-only) if
    /// it does not exist. A file that others may read or write, or that another user owns, is refused:
    /// it would let them control every host.
    /// </summary>
    public static X509Certificate2 LoadOrCreate(string path)
    {
        var directory = Path.GetDirectoryName(Path.GetFullPath(path))!;
        if (!File.Exists(path))
        {
            HostDirectory.EnsurePrivate(directory);
            Create(path);
        }
        return Load(path);
    }

    /// <summary>Loads an existing certificate file after checking it is the caller's own and owner-only.</summary>
    public static X509Certificate2 Load(string path)
    {
        FileStatus status;
        try { status = FileStatus.Of(path); }
        catch (IOException e) { throw new ClusterSecurityException($"cannot read the cluster certificate {path}: {e.Message}"); }
        if (status.Owner != FileStatus.CurrentUser)
            throw new ClusterSecurityException($"the cluster certificate {path} belongs to user {status.Owner}, not to this user ({FileStatus.CurrentUser})");
        if ((status.Mode & GroupOrOther) != 0)
            throw new ClusterSecurityException(
                $"the cluster certificate {path} may be read or written by others (mode {Convert.ToString((int)status.Mode & 0x1FF, 8)}): chmod 600 {path}");
        try
        {
            var certificate = X509CertificateLoader.LoadPkcs12FromFile(path, password: null, X509KeyStorageFlags.EphemeralKeySet);
            if (!certificate.HasPrivateKey) throw new ClusterSecurityException($"the cluster certificate {path} has no private key");
            return certificate;
        }
        catch (CryptographicException e) { throw new ClusterSecurityException($"the cluster certificate {path} is not a PKCS#12 certificate with its key: {e.Message}"); }
        catch (UnauthorizedAccessException e) { throw new ClusterSecurityException($"cannot read the cluster certificate {path}: {e.Message}"); }
    }

    /// <summary>
    /// Writes a new self-signed certificate to <paramref name="path"/>, owner-only from its creation.
    /// Two processes creating it at once: the first rename wins and the other's file is dropped, so
    /// both load the same certificate.
    /// </summary>
    public static void Create(string path, string subject = "CN=ActorVmm cluster")
    {
        using var key = ECDsa.Create(ECCurve.NamedCurves.nistP256);
        var request = new CertificateRequest(subject, key, HashAlgorithmName.SHA256);
        request.CertificateExtensions.Add(new X509EnhancedKeyUsageExtension(
            [new Oid("1.3.6.1.5.5.7.3.1"), new Oid("1.3.6.1.5.5.7.3.2")], critical: false)); // serverAuth, clientAuth
        request.CertificateExtensions.Add(new X509KeyUsageExtension(X509KeyUsageFlags.DigitalSignature, critical: true));
        var now = DateTimeOffset.UtcNow;
        using var certificate = request.CreateSelfSigned(now.AddMinutes(-5), now.AddYears(20));
        var bytes = certificate.Export(X509ContentType.Pkcs12);
        var temporary = $"{path}.{Environment.ProcessId}.{Guid.NewGuid():N}.tmp";
        using (var file = new FileStream(temporary, new FileStreamOptions
               {
                   Mode = FileMode.CreateNew, Access = FileAccess.Write, UnixCreateMode = OwnerOnly,
               }))
            file.Write(bytes);
        try { File.Move(temporary, path, overwrite: false); }
        catch (IOException) when (File.Exists(path)) { File.Delete(temporary); }
    }

    /// <summary>
    /// The remoting setup for an actor system that uses <paramref name="certificate"/>: TLS, mutual
    /// authentication, and a peer accepted only if it presents this same certificate.
    /// </summary>
    public static Setup Remoting(X509Certificate2 certificate)
    {
        var thumbprint = certificate.Thumbprint;
        return new DotNettySslSetup(certificate, suppressValidation: false, requireMutualAuthentication: true,
            validateCertificateHostname: false,
            (peer, _, _, _, _) => peer is not null && string.Equals(peer.Thumbprint, thumbprint, StringComparison.OrdinalIgnoreCase));
    }

    /// <summary>The HOCON that turns TLS on for remoting (the certificate comes from <see cref="Remoting"/>).</summary>
    public const string RemotingConfig = "akka.remote.dot-netty.tcp.enable-ssl = true";
}

/// <summary>A file's or directory's owner and permission bits, from stat(2).</summary>
internal readonly record struct FileStatus(uint Owner, UnixFileMode Mode)
{
    /// <summary>The effective user id of this process: the one whose files these must be.</summary>
    public static uint CurrentUser => geteuid();

    public static FileStatus Of(string path)
    {
        var buffer = new byte[StatSize];
        if (stat(path, buffer) != 0)
        {
            var errno = System.Runtime.InteropServices.Marshal.GetLastPInvokeError();
            throw errno == 2 ? new FileNotFoundException($"{path} does not exist") : new IOException($"cannot stat {path} (errno {errno})");
        }
        return new FileStatus(BitConverter.ToUInt32(buffer, StatUidOffset), (UnixFileMode)(BitConverter.ToUInt32(buffer, StatModeOffset) & 0xFFF));
    }

    /// <summary>x86-64 <c>struct stat</c> (glibc, the kernel's layout): 144 bytes, st_mode at 24, st_uid at 28.</summary>
    private const int StatSize = 144, StatModeOffset = 24, StatUidOffset = 28;

    [System.Runtime.InteropServices.DllImport("libc")]
    private static extern uint geteuid();

    [System.Runtime.InteropServices.DllImport("libc", SetLastError = true)]
    private static extern int stat(string path, byte[] buffer);
}
