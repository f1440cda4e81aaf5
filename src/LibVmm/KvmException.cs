namespace ActorVmm.LibVmm;

/// <summary>An ioctl or mapping that failed, with the operation and the errno text.</summary>
public sealed class KvmException : VmmException
{
    public string Operation { get; }
    public int Errno { get; }

    public KvmException(string operation, int errno)
        : base($"{operation} failed: {Native.ErrorText(errno)} (errno {errno})")
    {
        Operation = operation;
        Errno = errno;
    }

    public KvmException(string message) : base(message)
    {
        Operation = "";
    }

    internal static KvmException Last(string operation) =>
        new(operation, System.Runtime.InteropServices.Marshal.GetLastPInvokeError());
}
