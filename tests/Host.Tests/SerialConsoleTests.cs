using System.Text;

namespace ActorVmm.Host.Tests;

public sealed class SerialConsoleTests
{
    private static void WriteAll(SerialConsole console, byte[] bytes)
    {
        foreach (var b in bytes) console.Write(b);
    }

    [Fact]
    public void A_captured_console_keeps_what_the_guest_wrote()
    {
        using var console = SerialConsole.Captured();
        WriteAll(console, Encoding.ASCII.GetBytes("Hello\r\nworld"));
        console.Write(0xE9); // Latin-1 é: one char per byte
        Assert.Equal("Hello\r\nworld\u00E9", console.CapturedText());
        Assert.Equal(13, console.BytesWritten);
        Assert.Equal([.. Encoding.ASCII.GetBytes("Hello\r\nworld"), 0xE9], console.CapturedBytes());
    }

    [Fact]
    public void The_capture_is_bounded_but_every_byte_is_counted()
    {
        using var console = SerialConsole.Captured();
        for (var i = 0; i < SerialConsole.CaptureLimit + 100; i++) console.Write((byte)'x');
        Assert.Equal(SerialConsole.CaptureLimit, console.CapturedBytes().Length);
        Assert.Equal(SerialConsole.CaptureLimit + 100L, console.BytesWritten);
    }

    [Fact]
    public void A_file_console_has_every_byte_after_dispose()
    {
        using var dir = new TempDir();
        var path = dir.File("console.txt");
        var bytes = new byte[10_000];
        for (var i = 0; i < bytes.Length; i++) bytes[i] = (byte)(i % 251); // includes '\n' and 0x00
        var console = SerialConsole.ToFile(path);
        WriteAll(console, bytes);
        console.Write((byte)'!'); // no newline after it: only Dispose flushes it
        console.Dispose();
        Assert.Equal([.. bytes, (byte)'!'], File.ReadAllBytes(path));
        Assert.Equal([.. bytes, (byte)'!'], console.CapturedBytes());
    }

    [Fact]
    public void A_file_console_flushes_at_each_newline()
    {
        using var dir = new TempDir();
        var path = dir.File("console.txt");
        using var console = SerialConsole.ToFile(path);
        WriteAll(console, Encoding.ASCII.GetBytes("boot ok\n"));
        using var reader = new FileStream(path, FileMode.Open, FileAccess.Read, FileShare.ReadWrite);
        using var text = new StreamReader(reader);
        Assert.Equal("boot ok\n", text.ReadToEnd());
    }

    [Fact]
    public void A_file_console_truncates_an_existing_file()
    {
        using var dir = new TempDir();
        var path = dir.Write("console.txt", "old content that is long");
        var console = SerialConsole.ToFile(path);
        WriteAll(console, "new"u8.ToArray());
        console.Dispose();
        Assert.Equal("new", File.ReadAllText(path));
    }

    [Fact]
    public void A_file_console_in_a_missing_directory_fails_with_an_io_error()
    {
        using var dir = new TempDir();
        Assert.ThrowsAny<IOException>(() => SerialConsole.ToFile(Path.Combine(dir.Path, "no", "such", "dir", "console.txt")));
    }
}
