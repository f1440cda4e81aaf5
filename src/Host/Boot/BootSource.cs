using System.Globalization;
using ActorVmm.Host.Config;

namespace ActorVmm.Host.Boot;

/// <summary>
/// What a VM boots, read from actorvmm.vm.boot: one of a kernel (<c>kernel</c>, with <c>initrd</c> and
/// <c>append</c>; recognised by its contents), a flat firmware image (<c>firmware</c>) or a flat binary
/// entered in real mode (<c>flat</c>, at <c>load-address</c>, entered at <c>entry</c>). The command line's
/// --kernel, --firmware, --flat ... set the same keys. Files are read here: a path is one on the host
/// that builds the VM.
/// </summary>
public static class BootSource
{
    /// <summary>The image <paramref name="config"/> names. Throws <see cref="ConfigException"/> or
    /// <see cref="BootException"/> with what is wrong.</summary>
    public static BootImage FromConfig(Akka.Configuration.Config config)
    {
        string? Get(string key) => config.GetString($"actorvmm.vm.boot.{key}", "") is { Length: > 0 } v ? v : null;
        var kernel = Get("kernel");
        var initrd = Get("initrd");
        var append = Get("append");
        var firmware = Get("firmware");
        var flat = Get("flat");
        if (new[] { firmware, flat, kernel }.Count(p => p is not null) > 1)
            throw new ConfigException("give one of --firmware, --flat or --kernel");
        if (kernel is null && (initrd is not null || append is not null))
            throw new ConfigException("--initrd and --append (actorvmm.vm.boot.initrd, .append) go with --kernel (actorvmm.vm.boot.kernel)");
        if (flat is null && (Get("load-address") is not null || Get("entry") is not null))
            throw new ConfigException("--load-address and --entry (actorvmm.vm.boot.load-address, .entry) go with --flat (actorvmm.vm.boot.flat)");
        if (kernel is not null)
            return KernelKind.Recognise(ReadImage(kernel), kernel, append ?? "",
                initrd is null ? null : ReadImage(initrd), Path.GetFileName(initrd ?? "initrd"));
        if (firmware is not null) return new FirmwareImage(ReadImage(firmware));
        if (flat is not null)
        {
            var address = ParseNumber(Get("load-address") ?? "0x7C00", "--load-address");
            var (cs, ip) = Get("entry") is { } e ? ParseEntry(e) : FlatImage.DefaultEntry(address);
            return new FlatImage(ReadImage(flat), address, cs, ip);
        }
        throw new ConfigException("nothing to boot: give --kernel FILE, --firmware FILE or --flat FILE (or try 'actorvmm demo')");
    }

    /// <summary>The keys of actorvmm.vm.boot that name files (made absolute by a client that sends them to a host).</summary>
    public static readonly string[] FileKeys = ["kernel", "initrd", "firmware", "flat"];

    public static byte[] ReadImage(string path)
    {
        try
        {
            if (Directory.Exists(path)) throw new BootException($"image {path} is a directory");
            var bytes = File.ReadAllBytes(path);
            if (bytes.Length == 0) throw new BootException($"image {path} is empty");
            return bytes;
        }
        catch (FileNotFoundException) { throw new BootException($"image {path} does not exist"); }
        catch (DirectoryNotFoundException) { throw new BootException($"image {path} does not exist"); }
        catch (UnauthorizedAccessException) { throw new BootException($"image {path} cannot be read (permission denied)"); }
        catch (IOException e) { throw new BootException($"image {path} cannot be read: {e.Message}"); }
    }

    public static ulong ParseNumber(string text, string what)
    {
        var t = text.Trim();
        var ok = t.StartsWith("0x", StringComparison.OrdinalIgnoreCase)
            ? ulong.TryParse(t[2..], NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out var v)
            : ulong.TryParse(t, NumberStyles.None, CultureInfo.InvariantCulture, out v);
        if (!ok) throw new ConfigException($"{what}: \"{text}\" is not a number (decimal or 0x-hex)");
        return v;
    }

    public static (ushort Cs, ushort Ip) ParseEntry(string text)
    {
        var parts = text.Split(':');
        if (parts.Length == 2 &&
            ushort.TryParse(parts[0], NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out var cs) &&
            ushort.TryParse(parts[1], NumberStyles.AllowHexSpecifier, CultureInfo.InvariantCulture, out var ip))
            return (cs, ip);
        throw new ConfigException($"--entry: \"{text}\" is not CS:IP in hex (e.g. 0000:7C00)");
    }
}
